"""`python -m posttrain` and `accelerate launch -m posttrain STAGE CONFIG`: the posttrain command."""

from posttrain.cli import main

main()
