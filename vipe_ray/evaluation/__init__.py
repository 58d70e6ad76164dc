"""Evaluation: cross-view retrieval protocols, validation during training, statistics, miss reports and the test
ledger.
"""
