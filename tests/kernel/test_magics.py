"""Parsing of %sm lines, on the host."""

import pytest

from sm_kernel import magics
from sm_kernel.magics import MagicCall, MagicUsageError, is_magic_cell, parse


@pytest.mark.parametrize("code, call", [
    ("%sm help", MagicCall("help", ())),
    ("  %sm status  \n", MagicCall("status", ())),
    ("%sm timeout 2.5", MagicCall("timeout", (2.5,))),
    ("%sm timeout off", MagicCall("timeout", (None,))),
    ("%sm snapshot", MagicCall("snapshot", ())),
    ("%sm snapshot before-fit_2.a", MagicCall("snapshot", ("before-fit_2.a",))),
    ("\n%sm restore base\n\n", MagicCall("restore", ("base",))),
    ("%sm list", MagicCall("list", ())),
    ("%sm delete 'base'", MagicCall("delete", ("base",))),
    ("%sm balloon", MagicCall("balloon", ())),
    ("%sm balloon 256", MagicCall("balloon", (256,))),
])
def test_good_lines(code, call):
    assert is_magic_cell(code)
    assert parse(code) == call


@pytest.mark.parametrize("code, message", [
    ("%sm", "%sm needs a command"),
    ("%sm launch", "unknown %sm command 'launch'"),
    ("%sm help me", "usage: %sm help"),
    ("%sm timeout", "usage: %sm timeout SECONDS|off"),
    ("%sm timeout nan", "between 0 and"),
    ("%sm timeout 1e9", "between 0 and"),
    ("%sm timeout ten", "'ten' is not a number of seconds"),
    ("%sm snapshot a b", "usage: %sm snapshot [NAME]"),
    ("%sm snapshot ../x", "is not valid"),
    ("%sm snapshot .hidden", "is not valid"),
    ("%sm snapshot " + "x" * 65, "is not valid"),
    ("%sm restore", "usage: %sm restore NAME"),
    ("%sm delete 'unclosed", "cannot read the %sm line"),
    ("%sm list\nx = 1", "alone in its cell"),
    ("%sm balloon -5", "the balloon target is whole MiB, 0 or more, not '-5'"),
    ("%sm balloon half", "not 'half' (e.g. %sm balloon 256)"),
    ("%sm balloon 1 2", "usage: %sm balloon [MIB]"),
])
def test_bad_lines_say_what_to_do_in_one_line(code, message):
    with pytest.raises(MagicUsageError) as caught:
        parse(code)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("code", ["print('%sm help')", "x = 1\n%sm list", "%smx", "# %sm help", ""])
def test_cells_for_the_guest(code):
    assert not is_magic_cell(code)


def test_every_magic_has_its_help_in_its_docstring():
    rows = dict(magics.help_rows())
    assert set(rows) == {magics.usage(name) for name in magics.MAGICS}
    assert all(rows.values())


def test_tables_escape_html_and_align_text():
    bundle = magics.table(["name", "size"], [["<b>", "1 KiB"], ["long-name", "2 B"]], "t")
    assert "&lt;b&gt;" in bundle["text/html"] and "<b>" not in bundle["text/html"].replace("<b>t</b>", "")
    assert bundle["text/plain"].splitlines() == ["t", "name       size", "<b>        1 KiB", "long-name  2 B"]
