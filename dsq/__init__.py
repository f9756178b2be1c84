"""dsq: denoised smoothing as a job system (Salman et al. 2020, Cohen et al. 2019)."""

__version__ = "0.1.0"
