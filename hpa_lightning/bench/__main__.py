"""`python -m hpa_lightning.bench [quick=true] [sections=...]`: the speed benchmark (see hpa_lightning/bench/)."""

from hpa_lightning.bench.suite import main

if __name__ == "__main__":
    main()
