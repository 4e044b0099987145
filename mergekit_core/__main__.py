from mergekit_core.cli import console_main

console_main()
