"""The one implementation of long jobs: run directories and the output policy (`outputs`), exact
checkpoints and resume (`checkpoint`, `state`), metrics and trackers (`metrics`), seeding (`seeding`),
optimizer, schedule and EMA (`optim`), Accelerate setup (`accelerate`), and the training loop that
fine-tuning and DiT training share (`trainer`). A task supplies its model, data, loss, evaluation and
export; everything else is here."""
