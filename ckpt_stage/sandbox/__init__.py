"""The isolated worker: parent-side runner (``runner``) and child-side loader (``loader``)."""
