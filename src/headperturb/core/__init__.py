"""Torch-free: the config, head jobs and their plans, the kinds, the checks made while the DAG is
built, costs, and atomic checksummed files. The Snakefile imports only this (and
:mod:`headperturb.workflow.lifecycle`) while it builds the DAG."""
