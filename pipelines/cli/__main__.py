"""`python -m pipelines.cli …` is `cdm …` (for nodes where the `cdm` script is not on the PATH)."""

from pipelines.cli import main

main()
