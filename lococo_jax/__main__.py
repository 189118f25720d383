from lococo_jax.cli import main

main()
