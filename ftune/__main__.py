from ftune.cli import app

app()
