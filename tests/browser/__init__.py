"""The browser test: JupyterLab on the sm kernel, driven in Chromium from the host.

See docs/browser-test.md.
"""
