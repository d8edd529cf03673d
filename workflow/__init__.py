"""lrmerge: teach LLMs low-resource languages by continual pre-training and model merging.

One module per workflow stage; each is runnable as ``python -m workflow.<stage>``.
"""
