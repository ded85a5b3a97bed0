"""The shipped prompt sets (``advantageflow/assets/prompts``) and the generator that makes
them (:mod:`advantageflow.prompts.generate`).  A config names one as ``prompts/NAME``; such a
path resolves to the shipped file when it does not exist relative to the working folder
(:func:`advantageflow.tasks.prompt_file.resolve_prompt_path`)."""
