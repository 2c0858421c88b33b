//! Block formats and compute kernels. Knows nothing of files or models.
