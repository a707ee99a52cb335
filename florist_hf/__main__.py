from florist_hf.cli import main

main()
