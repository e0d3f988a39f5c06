"""Triton kernels of advcal, installed as ``advcal.kernels``. Importing this package does not
import Triton; each kernel module does, and the ops layer checks availability first."""
