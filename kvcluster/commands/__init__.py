"""One module per ``kvcluster`` subcommand (see ``kvcluster.cli``)."""
