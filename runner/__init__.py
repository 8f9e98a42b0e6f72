"""The run machinery above `training` and `metrics`: the option builder (options.py), the metrics' checks
(metric_plan.py), the process launcher (launch.py), the run directory (run_dir.py), the errors the user sees
(errors.py) and the generator scripts' helpers (sampling.py). The scripts (train.py, generate.py, ...) are
command lines over this package; `click` is imported only here and in the scripts."""
