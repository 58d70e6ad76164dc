"""The platform: sweep and study specs, Ray Tune driver, trial resources, MLflow runs and tracking, reports, log
filters.
"""
