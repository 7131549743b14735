"""Package build; the optional C++/CUDA extension modlora._C is added here (see csrc/)."""

from setuptools import setup

setup()
