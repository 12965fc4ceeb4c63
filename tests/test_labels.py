"""Class labels shared by every stage (ssl4sci.labels): how a list of class names is shown in a message."""
from ssl4sci.labels import some_names


def test_some_names_quotes_at_most_five_and_marks_the_rest():
    assert some_names(["a", "b", "c"]) == "'a', 'b', 'c'"
    assert some_names([f"n{i}" for i in range(7)]) == "'n0', 'n1', 'n2', 'n3', 'n4', ..."
    assert some_names(("x", "y", "z"), most=2) == "'x', 'y', ..."
    assert some_names([]) == ""
