"""One thin module per ``diffalign`` subcommand (NAME, HELP, DESCRIPTION, CONFIG, run)."""
