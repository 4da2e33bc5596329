"""Pure, importable helpers shared by the stage scripts."""
