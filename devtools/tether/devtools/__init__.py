"""Development tools: the Kubernetes API emulator, embedded servers, the demo stack, the simulator, benchmarks.

Never imported by production code (an import-linter contract checks it); the CLI loads them lazily.
"""
