from phisnet_jax.cli import main

main()
