from mergekit_core.cli import main

main()
