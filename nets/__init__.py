"""Your own model code for `model.factory` (e.g. `nets.example.small_cnn`); every stage that builds a network
depends on this folder."""
