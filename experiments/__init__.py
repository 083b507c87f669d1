"""The article suite: configs, data, models and figures built on gradtools."""
