"""The report layer: paper-style Markdown tables, findings and figures from MLflow runs (no torch).

``runs`` reads a table's cells from MLflow, ``tables`` renders the paper's layouts, ``findings`` judges the
paper's claims against the seed-to-seed noise, ``figures`` draws the PNGs, ``write`` puts it together
(``ddps report``).
"""
