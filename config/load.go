package config

// Load reads, decodes (unknown keys rejected), defaults and validates the
// file at path, then reads the qmail control files and tcprules it names.
// On failure the error is an Errors value listing every problem.
func Load(path string) (*Config, error) { panic("TODO") }

// Default returns the embedded defaults: the same values relay.example.toml
// spells out.
func Default() *Config { panic("TODO") }
