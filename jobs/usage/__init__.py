"""Usage accounting: what each request through the proxy used (records.py), the figures over them (figures.py), and
the pages, chart and command line that show them."""
