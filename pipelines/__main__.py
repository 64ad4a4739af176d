"""`python -m pipelines …` is `cdm …`."""

from pipelines.cli import main

main()
