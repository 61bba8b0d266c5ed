"""Build hook for the cffi KVM binding; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["vmm/_build_kvm.py:ffibuilder"])
