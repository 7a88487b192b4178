"""`python -m unlearnbench` (so `accelerate launch -m unlearnbench <stage>` works)."""

from unlearnbench.cli import main

if __name__ == "__main__":
    main()
