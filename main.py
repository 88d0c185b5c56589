"""Entry point with the reference's shape: ``python main.py --config ... --workdir ... --mode ...``.

Equivalent to the installed ``scoreflow`` command.
"""

from scoreflow.cli import main

if __name__ == "__main__":
    main()
