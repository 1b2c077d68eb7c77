"""Method plugins, one module each; every module registers its class with ``benchmark.method.METHODS``."""
