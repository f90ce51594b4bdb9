# note: a package, so this folder's conftest.py is imported as `browser.conftest` and does not
# shadow tests/conftest.py, which other test modules import by its bare name `conftest`.
