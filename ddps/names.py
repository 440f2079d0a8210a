"""The names that orchestration writes into MLflow and the report reads back: one spelling per quantity.

Imported by ddps/orchestration (which tags and logs runs), ddps/report (which reads them, without torch) and
the engine's evaluation record (which names its summary). Nothing here imports anything: a store written by
one version of ddps must read in the next, so these strings are a stored format — add names, do not rename.
docs/design.md ("The MLflow contract") says what each run carries.
"""

# ---- run tags -------------------------------------------------------------------------------------
STEP = "ddps.step"                  # what a run is: one of the STEP_* values below, or a training step
CONTENT_HASH = "ddps.content_hash"  # the content hash of what the run trained or evaluated
SUMMARY = "ddps.summary"            # an evaluation's summary: JSON of the SUMMARY_KEYS it has
PIPELINE = "ddps.pipeline"          # the pipeline's hash, on its parent and every step run
SWEEP = "ddps.sweep"                # the sweep's hash (its cells' evaluations), on its parent and trials
TABLE = "ddps.table"                # the experiment file's name
ROW = "ddps.row"                    # an evaluation's row and column labels in its table
COLUMN = "ddps.column"
CELL = "ddps.cell"                  # all its coordinates, "axis=label, ..."
TRAINING_RUN = "ddps.training_run"  # the run that trained the evaluated model
TITLE = "ddps.title"                # on a sweep's parent: the table's title, size, axes and their order
CELLS = "ddps.cells"
ROWS = "ddps.rows"
COLUMNS = "ddps.columns"
ORDER = "ddps.order"
AXIS = "axis."                      # prefix: axis.<name> = the cell's label on that axis
STEP_LINK = "step."                 # prefix, on a pipeline's parent: step.<name> = that step's run id
REFINER_URI = "refiner_uri"         # runs:/ URI of the logged refiner checkpoint
IMPORTED_FROM = "ddps.imported_from"  # runs of a config whose base is imported (base.pretrained): its source
BASE_URI = "base_uri"               # runs:/ URI of the base checkpoint logged beside the refiner
GIT_COMMIT = "git_commit"           # the code version (also as MLflow's SOURCE_GIT_COMMIT)
EVAL_SPLIT = "ddps.eval_split"      # on an evaluation run: the split it scored (eval.split; none before it: val)

# ---- MLflow's own names, which its UI reads (ddps sets them on every run and experiment it creates) ----
EXPERIMENT_KIND = "mlflow.experimentKind"     # experiment tag: what the experiment is for
KIND_MODEL_TRAINING = "custom_model_development"  # MLflow 3's kind for model training (not GenAI)
SOURCE_NAME = "mlflow.source.name"            # the runs table's Source column: the ddps command
SOURCE_TYPE = "mlflow.source.type"            # LOCAL (a command run on a machine)
SOURCE_GIT_COMMIT = "mlflow.source.git.commit"  # the runs table's Version column
SOURCE_GIT_BRANCH = "mlflow.source.git.branch"
USER = "mlflow.user"                          # the runs table's User column
DATA_CONTEXT = "mlflow.data.context"          # a dataset input's tag: what the run did with the data
CONTEXT_TRAINING, CONTEXT_EVALUATION = "training", "evaluation"
SYSTEM_METRICS = "system/"                    # prefix of the system metrics of a training run (CPU, memory, GPU)

STEP_EVAL = "eval"
STEP_PIPELINE = "pipeline"
STEP_SWEEP = "sweep"

# ---- metrics of an evaluation run -----------------------------------------------------------------
# per-step history (MLflow step 0 = the base's own prediction, k = after refinement step k)
MIOU, MBIOU, AACC = "mIoU", "mBIoU", "aAcc"
SCORES = (MIOU, MBIOU)              # the two scores the tables and figures report
CLASS_IOU = "IoU."                  # prefix: IoU.<class name>
MS_MIOU, MS_MBIOU = "ms_mIoU", "ms_mBIoU"  # multi-scale + flip, at step 0 (base) and the last step
PARAMS_BASE = "params_base_M"       # #P(M) of the tables
PARAMS_DENOISER = "params_denoiser_M"
RELIANCE = "reliance_"              # prefix: reliance_own / _oracle / _random (and _oracle_t in the summary)

# ---- the summary: <prediction>_<score> ------------------------------------------------------------
BASE, STEP1, LAST = "base", "step1", "last"


def summary_key(prediction: str, score: str) -> str:
    """base_mIoU, step1_mBIoU, last_ms_mIoU, ...: the summary's spelling of a prediction's score."""
    return f"{prediction}_{score}"


BASE_MIOU, BASE_MBIOU = summary_key(BASE, MIOU), summary_key(BASE, MBIOU)
STEP1_MIOU, STEP1_MBIOU = summary_key(STEP1, MIOU), summary_key(STEP1, MBIOU)
LAST_MIOU, LAST_MBIOU = summary_key(LAST, MIOU), summary_key(LAST, MBIOU)
BASE_MS_MIOU, LAST_MS_MIOU = summary_key(BASE, MS_MIOU), summary_key(LAST, MS_MIOU)
STEPS = "steps"                     # how many refinement steps the summary's "last" is
RELIANCE_OWN, RELIANCE_ORACLE, RELIANCE_RANDOM, RELIANCE_ORACLE_T = (
    RELIANCE + k for k in ("own", "oracle", "random", "oracle_t"))
SUMMARY_KEYS = (BASE_MIOU, BASE_MBIOU, STEP1_MIOU, STEP1_MBIOU, LAST_MIOU, LAST_MBIOU, STEPS, BASE_MS_MIOU,
                LAST_MS_MIOU, RELIANCE_OWN, RELIANCE_ORACLE, RELIANCE_RANDOM, RELIANCE_ORACLE_T)
# ---- artifacts of an evaluation run ---------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"               # the resolved config, as its params
ARTIFACT_STRIPS = "strips"                    # folder: strip-<image index>.png, image | truth | base | steps
ARTIFACT_PROBABILITIES = "probabilities.npz"  # the first strip image's class probabilities, base and steps
ARTIFACT_MODEL = "model"                      # folder: the refiner checkpoint (REFINER_URI points at it) and
                                              # its base's (BASE_URI)

# what the held-out checks during a refiner's training report (as <split>_<key>) and keep in its checkpoint
CHECK_KEYS = (BASE_MIOU, STEP1_MIOU, LAST_MIOU, LAST_MBIOU)
MULTISTEP_GAIN = "multistep_gain"   # last_mIoU - step1_mIoU: what the steps after the first add
# and, with train.check_reliance, what a multi-step stage's checks report besides (the diagnostic's last-step mIoUs)
CHECK_RELIANCE_KEYS = (RELIANCE_OWN, RELIANCE_ORACLE, RELIANCE_RANDOM, MULTISTEP_GAIN)
