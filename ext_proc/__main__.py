from ext_proc.cli import main

main()
