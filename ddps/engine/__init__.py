"""Engine: training and evaluation loops as plain functions of (config, reporter)."""
