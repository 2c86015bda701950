"""Tools to test r1ray runs from the outside (chaos: random SIGKILLs; free ports; a run directory's records). Base
layer: no stage imports."""
