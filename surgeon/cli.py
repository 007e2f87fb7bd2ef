def main(argv=None):\n    raise SystemExit("surgeon: command line not built yet")
