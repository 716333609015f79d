"""Evaluation tasks of `kvarn eval`: scoring functions, needle prompts and the task runners (`kvarn_eval.evaluate`)."""
