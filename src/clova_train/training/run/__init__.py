"""Run configuration: the configs of `clova train`, resolving a request into the run every rank receives, and the checks before step 1."""
