"""Helpers of the DE-GRAD flagship ``examples/deblur_celeba.py``: what is not its story."""
