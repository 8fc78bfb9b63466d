from vmc.cli import main

main()
