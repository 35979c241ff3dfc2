from finegpt.cli import main

main()
