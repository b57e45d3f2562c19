"""Entry point: ``python cli.py --help`` (the same commands as the installed ``mlx-grpo``)."""
from mlx_grpo.cli import main

main()
