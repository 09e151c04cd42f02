"""For operators: Prometheus metrics (metrics.py) behind an admin-issued scrape token, and the site dashboard."""
