"""The process environment, stage start-up, devices and atomic files."""
