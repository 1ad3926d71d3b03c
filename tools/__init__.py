"""Development tools shared by the test suite and the benchmarks (not part of the package).

They live here, outside ``tests/`` and ``bench/``, so each side imports them without
importing the other: the benchmarks do not depend on the test suite, and the tests do not
depend on a folder of scripts. Both find this package because the checkout's root is on
``sys.path`` (pytest puts it there for ``tests``; each benchmark adds it for ``dckpt``).
"""
