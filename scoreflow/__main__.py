"""``python -m scoreflow`` runs the command line (also under ``torchrun -m scoreflow``)."""

from scoreflow.cli import main

if __name__ == "__main__":
    main()
