"""``ponder tune``, by job: ``recording`` (the arms' branches and the machine's speed), ``fitting`` (policies fitted
by replay, the profile), ``reporting`` (tables and plot) and ``command`` (the CLI, whose docstring describes it)."""
