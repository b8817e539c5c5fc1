"""Data helpers: long-tailed profiles, batched augmentation, and the data set builders."""
